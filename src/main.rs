fn main() {
    println!("csi-nfs-fuse");
}
