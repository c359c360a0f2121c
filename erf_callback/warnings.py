"""Warning category of erf-callback, so users can filter it in one line."""

__all__ = ["ERFWarning"]


class ERFWarning(UserWarning):
    """Numerical trouble in an ERF probe or fit (NaN/Inf, all-zero gradients, cut-off ERF).

    Example:
        >>> import warnings
        >>> from erf_callback import ERFWarning
        >>> warnings.simplefilter("ignore", ERFWarning)
    """
