"""Cityscapes data: download / S3 mirror / synthetic generation, trainId labels, validation, Dataset."""
