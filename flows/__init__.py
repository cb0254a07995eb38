"""Prefect flows that orchestrate the components: ``finetune`` (the pipeline) and one flow per stage."""
