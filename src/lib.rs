//! cryptonn
