"""cachekit's built-in reuse policies.

This package is a plugin like any third-party one: the core never imports it; it registers its
policies through the ``cachekit`` entry-point group (:mod:`cachekit_policies.plugin`).
"""
