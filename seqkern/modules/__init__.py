"""Drop-in nn.Modules with upstream names, signatures and state_dict keys (issue: Reference
oracle). Empty until those modules land."""

__all__: list[str] = []
