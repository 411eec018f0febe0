"""MoDA: depth-KV attention (earlier attention layers' K/V attended per position by later ones)."""
