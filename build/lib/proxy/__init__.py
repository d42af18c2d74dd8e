"""The transparent proxy: accepts redirected agent connections and relays them to where they meant to go."""
