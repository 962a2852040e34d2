"""Translations of recipe sections into the libraries' own objects, one module each."""
