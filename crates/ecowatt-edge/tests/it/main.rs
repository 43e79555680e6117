//! The edge against real sockets on loopback: stalled, dribbling and flooding
//! peers, and shutdown with requests in flight.

mod limits;
mod shutdown;
mod tls;
