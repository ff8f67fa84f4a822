"""Preprocessing shared by every model family: image decoding and resizing."""
