//! `usernsguard`: node agent, controller and operator CLI.

#[cfg(test)]
mod fixtures;
#[allow(dead_code)] // wired into `usernsguard controller` by a later commit
mod leader;

fn main() {
    println!("usernsguard");
}
