"""Server role: router, homomorphic fusion, router training, federated reward, GRPO, the ServerApp."""
