class ModelFormatError(ValueError):
    """A model file that cannot be used: not GGUF, truncated, corrupt, or of an unsupported kind."""

    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem
