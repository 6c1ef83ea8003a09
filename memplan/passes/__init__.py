"""Graph rewrites that apply a plan to fx graphs."""
