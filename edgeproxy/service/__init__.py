"""Running as a service: the master process, systemd's notifications, the unit file."""
