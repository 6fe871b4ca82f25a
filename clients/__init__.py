"""Client role: reward models, DP-SGD training, budget, encrypted signed scoring, the ClientApp."""
