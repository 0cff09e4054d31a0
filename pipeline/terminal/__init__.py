"""What every command shows on the terminal and how it fails: the rich console (:mod:`.console`),
silenced third-party noise (:mod:`.quiet`) and user errors, one message and exit 2 (:mod:`.user_error`)."""
