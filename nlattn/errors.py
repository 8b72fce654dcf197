"""The three errors nlattn raises; every framework raises the same ones."""


class ConfigError(ValueError):
    """A block's constructor keywords are invalid (raised when the config is built)."""


class InputError(ValueError):
    """A block got an input of the wrong rank, channel count, spatial size or dtype."""


class WeightError(ValueError):
    """Weights do not fit a block: lists every missing, extra, mis-shaped or non-finite tensor."""

    def __init__(self, block: str | None, problems: list[str]):
        self.block = block
        self.problems = list(problems)
        lines = "\n  - ".join(self.problems)
        super().__init__(f"{block}: {len(self.problems)} problem(s) with the weights:\n  - {lines}")
