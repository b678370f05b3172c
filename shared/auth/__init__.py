"""Who may do what: accounts and grants, logins, registry bearer tokens, upstream tokens."""
