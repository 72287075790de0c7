"""The upstream fixtures (`espnet_upstream`, `torchaudio_upstream`) live in tests/conftest.py,
shared by the compat, module and swap tests."""
