"""Demos built on the library: ``digits`` (the embedded CPU demo), ``easyvqa`` (real data, ``make eval``) and
``crossmodal`` (a spoken-digit audio tower and cross-modal captions). Nothing in the library imports them."""
