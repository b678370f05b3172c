"""The scheduler: fires cron triggers by enqueueing jobs, one leader at a time."""
