// Intentionally empty: this manifest only exists to fetch a package.
