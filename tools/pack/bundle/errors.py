"""The one error the bundler raises."""


class BundleError(ValueError):
    """The kit sources cannot be inlined into one namespace; the message names the file, the name and the fix."""
