"""A leaf library of cryptography: CKKS contexts and parameters, packing, fusion, blinding, release (flooding,
rounding), signatures, keys at rest. It imports no other part of secure_mor."""
