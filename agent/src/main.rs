//! `usernsguard`: node agent, controller and operator CLI.

fn main() {
    println!("usernsguard");
}
