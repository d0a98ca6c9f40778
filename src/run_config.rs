//! Per-run config and secrets from the config file. (in progress)
