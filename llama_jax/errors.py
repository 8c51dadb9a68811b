"""The errors llama_jax raises for problems a user can fix.

Every one is raised before anything expensive runs (compilation, loading weights,
writing a directory) and names the value at fault and what was expected.

    Error                 base of all of them
      ConfigError         a model, run, mesh, topology, LoRA, pruning, quantization or
                          attention setting that cannot work, or a combination of them
        DoesNotFitError   a step that needs more accelerator memory than a chip has
      CheckpointError     a model directory, checkpoint or weights file that is missing,
                          damaged, or does not match what reads it
      DataError           a data, tokenizer or task file, or a data setting, that
                          cannot give what was asked
    NonFiniteLossError    the loss or gradient became NaN or Inf during a run
"""


class Error(ValueError):
    """A llama_jax input (config, flag, file) that cannot be used as it is."""


class ConfigError(Error):
    """A setting, or a combination of settings, that cannot work."""


class DoesNotFitError(ConfigError):
    """A step that needs more accelerator memory per chip than the chip has."""


class CheckpointError(Error):
    """A missing, damaged or mismatched checkpoint or model directory, or a failed save."""


class DataError(Error):
    """A data, tokenizer or task file, or a data setting, that cannot be used."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN or Inf; the run stops without saving."""


def first_line(error: BaseException) -> str:
    """The error's type and first line, without TensorStore's long spec dump."""
    lines = str(error).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
    return f"{type(error).__name__}: {text[:300]}"
