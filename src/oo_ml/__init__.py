"""oo-ml: the scoring server of the oO tips product.

Handlers (`service`) translate between protobuf and domain types; the domain (`engine`,
`policies`, `features`) decides; stores (`sqlite_store`, `store`) persist. Generated
protobuf code lives in the separate top-level `oo` package.
"""

__version__ = "0.1.0"
