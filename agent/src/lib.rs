//! The Wiremesh agent.
