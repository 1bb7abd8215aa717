"""Training denoisers for pretrained classifiers: Salman et al.'s objectives and DE-CROP."""
