"""The classifier families `model.name` can name, in words, for error messages and `--help` (no imports:
the command line shows them without loading torch)."""

FAMILIES = (
    "the project's: demo_cnn, cifar_resnet20, cifar_resnet110, cifar_wrn28_10, cifar_wrn40_10",
    "torchvision's, by name (resnet50, vit_b_16, ...; list them: python -c \"import torchvision; "
    "print(torchvision.models.list_models())\")",
    "timm's, as timm/<architecture>[.<tag>] (timm/vit_base_patch16_224; list them: python -c \"import timm; "
    "print(timm.list_models('*vit*'))\")",
    "Hugging Face image classifiers, as huggingface with model.weights a save_pretrained folder (local or s3://)",
)

__all__ = ["FAMILIES"]
