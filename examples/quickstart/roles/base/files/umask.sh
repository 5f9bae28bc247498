# Installed by driftless (role base): group-private files by default.
umask 027
