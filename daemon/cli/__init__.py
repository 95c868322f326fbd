"""The command line (SPEC 8): commands, the admin client, progress display, the offline demo."""
