"""xlip: cross-modal attention masked modelling for medical vision-language pre-training."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "XLIP":  # lazy: `import xlip` stays light
        from xlip.api import XLIP

        return XLIP
    raise AttributeError(name)
