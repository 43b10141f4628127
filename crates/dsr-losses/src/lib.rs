//! dsr-losses
