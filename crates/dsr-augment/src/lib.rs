//! dsr-augment
