//! pgoutput decoder (placeholder, being written).
