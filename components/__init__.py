"""cityseg-ops components: plain, typed functions for each step of the pipeline (no Prefect here)."""
