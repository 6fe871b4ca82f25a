"""The key authority: the one role that holds the CKKS secret key; it decrypts only fusions it computes itself."""
