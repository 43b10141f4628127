//! dsr-train
