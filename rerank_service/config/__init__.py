"""Every setting declared once; read from flags, environment variables and a YAML file."""

from rerank_service.config.settings import ConfigError, SettingError, Settings, ca_bundle
from rerank_service.config.sources import add_serve_arguments, load_settings

__all__ = ["ConfigError", "SettingError", "Settings", "add_serve_arguments", "ca_bundle", "load_settings"]
