"""The reaper process: expiry and re-drive of stuck sessions, through stop commands."""
