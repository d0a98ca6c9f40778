//! Tokens: minting, checking, run patterns and capabilities. (in progress)
