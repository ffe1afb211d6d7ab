"""One exception hierarchy for the whole project.

Library code raises these; the CLI (`click.ClickException`) and the web API (`{"error",
"message"}` JSON) translate them at the edge. Messages say what was wrong and what to do in
words any caller can act on; where the remedy is a setting, the error names it (`setting`,
a field of engine.config.Settings or of the command), and each edge words it its own way:
the CLI as its option (`--index-dir`), the web app not at all (its users cannot pass one).
"""


class HistoseekError(Exception):
    """Base class: a problem the user can act on (bad input, missing file, mismatch)."""

    #: short machine-readable name used by the JSON API
    code = "error"

    def __init__(self, *args, setting: str | None = None):
        super().__init__(*args)
        self.setting = setting


class ConfigError(HistoseekError):
    code = "config"


class CatalogError(HistoseekError):
    code = "catalog"


class EncoderError(HistoseekError):
    """A checkpoint that cannot be loaded, or an encoder that does not match an index."""

    code = "encoder"


class ImageError(HistoseekError):
    """An image file or upload that cannot be read as an RGB picture."""

    code = "bad_image"


class SlideError(HistoseekError):
    """A whole-slide image that cannot be opened, read, or placed at a resolution."""

    code = "bad_slide"


class ShardError(HistoseekError):
    """A shard file that is missing, corrupt, or of another encoder."""

    code = "index"


class QueryError(HistoseekError):
    """A search query that cannot be answered (blank region, mpp far off, ...)."""

    code = "bad_query"


class DatasetError(HistoseekError):
    """A benchmark data set whose layout is not what its kind promises."""

    code = "dataset"


class NotFound(HistoseekError):
    code = "not_found"


class SlideChanged(SlideError):
    """An indexed slide whose file is gone, or no longer holds the content it was indexed
    with (its fingerprint differs): its pixels would not be the slide the catalog describes,
    so none are served (the web app answers 409) until `indexer build` settles it."""

    code = "slide_changed"
