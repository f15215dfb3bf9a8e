"""The command line: flags into settings, `--help`, exit codes, `plan` and `demo`."""
