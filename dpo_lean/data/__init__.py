"""The data path: sources -> formats (normalised records) -> templates + tokenize (token ids)."""
