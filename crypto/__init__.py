"""Cryptography: CKKS contexts, packing, the key authority and its policy, signatures, keys at rest."""
