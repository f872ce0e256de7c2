"""HTTP serving of exported artifacts (``genrec serve``)."""
