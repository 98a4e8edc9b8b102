"""The one error type for bad model input: files, config fields, tensor shapes, parallel layouts."""


from megagsm.errors import UserError


class ModelInputError(UserError):
    """Input the model code cannot take. The message is one line that names the file, field or
    tensor at fault; the checkpoint CLI prints it and exits with status 2."""
