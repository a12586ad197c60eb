"""The command-line programs: each parses its arguments, calls the library (vae_dist) and maps its
errors to exit codes (vae_dist.errors)."""
