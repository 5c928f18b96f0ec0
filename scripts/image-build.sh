#!/usr/bin/env bash
# Builds the mesh's container image (daemonset/Containerfile) without Docker or a registry,
# and puts it where the local kubelet runs pods from:
#
#   scripts/image-build.sh [--tag TAG] [--version V]      (root; default tag and version 0.13.0)
#
# 1. The base: Debian 12 from `debootstrap --variant=minbase bookworm`, fetched from the mirror
#    of this machine's own apt sources, kept as a rootfs tarball in ~/.cache/ambient-mesh/base
#    and imported once into buildah's storage as localhost/ambient-mesh/base:bookworm-<key>.
# 2. The image: `buildah bud` of the Containerfile on that base (chroot isolation, vfs storage,
#    --layers: a second tag with another VERSION reuses every layer but the last). pip inside
#    reaches the index this machine's pip uses (scripts/imagebuild.py pip-args).
# 3. Out: an OCI archive (~/.cache/ambient-mesh/images/archives/mesh-<tag>.tar), and the local
#    image store's entry (${AMBIENT_IMAGE_STORE:-~/.cache/ambient-mesh/images}/ambient-mesh/mesh/
#    <tag>/): rootfs/ complete first, then image.json (the "ready" mark).
#
# Cached: a key (hash of the Containerfile, constraints.txt, pyproject.toml, the packages'
# tracked files, this script and the version) is stored with the image; a run whose key
# matches does nothing. buildah's storage is private to this script
# (~/.cache/ambient-mesh/containers: `buildah --root` there to look at it).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

tag=0.13.0
version=
while [ $# -gt 0 ]; do
    case "$1" in
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "image-build: unknown argument $1" >&2; exit 2 ;;
    esac
done
version=${version:-$tag}
if [ "$(id -u)" != 0 ]; then
    echo "image-build: needs root (debootstrap, buildah's storage)" >&2
    exit 1
fi

repository=ambient-mesh/mesh
ref="$repository:$tag"
# AMBIENT_IMAGE_CACHE: where the base, buildah's storage and the archives are kept (a build
# apart from the machine's usual one, e.g. to time a fresh build, sets it and the store).
cache=${AMBIENT_IMAGE_CACHE:-${HOME:-/root}/.cache/ambient-mesh}
store=${AMBIENT_IMAGE_STORE:-${HOME:-/root}/.cache/ambient-mesh/images}
dest="$store/$repository/$tag"
archive="$cache/images/archives/mesh-$tag.tar"
containerfile=daemonset/Containerfile
codename=bookworm
py=python3
helper=(env -u PYTHONPATH "$py" "$root/scripts/imagebuild.py")
runroot=/run/ambient-mesh-buildah/$(printf '%s' "$cache" | sha256sum | cut -c1-8)
bah=(buildah --root "$cache/containers/storage" --runroot "$runroot" --storage-driver vfs)

# --- the content key --------------------------------------------------------------------
# The packages pyproject.toml's find installs: every top-level package but tests.
packages=()
for d in */; do
    d=${d%/}
    [ -f "$d/__init__.py" ] || continue
    case "$d" in tests | benchmarks | demo) continue ;; esac
    packages+=("$d")
done
package_files() {
    if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # Untracked files that git does not ignore are in the build context too.
        git -C "$root" ls-files -z --cached --others --exclude-standard -- "${packages[@]}"
    else
        find "${packages[@]}" -type f ! -path '*/__pycache__/*' -print0 | sort -z
    fi
}
key=$({
    echo "version=$version codename=$codename"
    sha256sum "$containerfile" constraints.txt pyproject.toml README.md .containerignore \
        scripts/image-build.sh scripts/imagebuild.py
    # (a tracked file deleted here is named by sha256sum's error: still a key)
    package_files | xargs -0 -r sha256sum 2>&1 || true
} | sha256sum | cut -c1-64)

up_to_date() {
    [ -f "$dest/image.json" ] && [ -d "$dest/rootfs" ] && [ -f "$archive" ] &&
        [ "$(cat "$dest/build-key" 2>/dev/null)" = "$key" ]
}
if up_to_date; then
    echo "image-build: $ref is up to date ($dest)"
    exit 0
fi
# One build at a time in a cache (two setups at once share its storage and store); the one
# that waited may find the image built meanwhile.
mkdir -p "$cache"
exec 9>"$cache/image-build.lock"
flock 9
if up_to_date; then
    echo "image-build: $ref is up to date ($dest)"
    exit 0
fi

# --- cleanup of what this run creates -------------------------------------------------------
containers=()
scratch=()
cleanup() {
    local c d m
    for c in "${containers[@]}"; do
        "${bah[@]}" umount "$c" >/dev/null 2>&1 || true
        "${bah[@]}" rm "$c" >/dev/null 2>&1 || true
    done
    for d in "${scratch[@]}"; do
        [ -e "$d" ] || continue
        # debootstrap mounts /proc and /sys (and may bind /dev) in its target: never delete
        # through a mount.
        while read -r m; do umount -l "$m" 2>/dev/null || true; done < <(
            awk -v d="$d" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/mounts | sort -r)
        rm -rf --one-file-system "$d"
    done
}
trap cleanup EXIT

start=$(date +%s)
mkdir -p "$cache/base" "$(dirname "$archive")" "$cache/containers"

# --- 1. the base ----------------------------------------------------------------------------
source_files=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] && source_files+=("$f")
done
sources=$("${helper[@]}" base-sources "$codename" "${source_files[@]}")
mirror_uri=$("${helper[@]}" mirror "$codename" <<<"$sources")
# (recipe: bump when what is done to the debootstrap tree below changes)
base_key=$(printf '%s\n' "recipe 2 $codename minbase $(dpkg --print-architecture)" "$sources" |
    sha256sum | cut -c1-12)
base_tar="$cache/base/$codename-minbase-$base_key.tar"
base_image="localhost/ambient-mesh/base:$codename-$base_key"

if ! "${bah[@]}" inspect --type image "$base_image" >/dev/null 2>&1; then
    if [ ! -f "$base_tar" ]; then
        echo "image-build: debootstrap --variant=minbase $codename from $mirror_uri"
        target=$(mktemp -d "$cache/base/rootfs.XXXXXX")
        scratch+=("$target")
        debootstrap --variant=minbase "$codename" "$target" "$mirror_uri" >"$target.log" 2>&1 || {
            tail -20 "$target.log" >&2
            echo "image-build: debootstrap failed; the log is $target.log" >&2
            exit 1
        }
        rm -f "$target.log"
        # The base as a Debian image is: the machine's Debian suites (not only the mirror's
        # main suite), no package lists or downloaded .debs, no host files debootstrap copies;
        # slim as Debian's -slim images (no docs, man pages or locales, now or later).
        printf '%s\n' "$sources" >"$target/etc/apt/sources.list"
        printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
            'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
            'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/lintian/*' \
            >"$target/etc/dpkg/dpkg.cfg.d/slim"
        find "$target/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
        find "$target/usr/share/doc" -mindepth 1 -type d -empty -delete
        rm -rf "$target/usr/share/man/"* "$target/usr/share/info/"* "$target/usr/share/locale/"* \
            "$target/usr/share/lintian/"*
        rm -f "$target/etc/apt/sources.list.d/"*.list "$target/etc/resolv.conf" "$target/etc/hostname"
        rm -rf "$target/var/lib/apt/lists/"* "$target/var/cache/apt/"* "$target/var/log/"*.log \
            "$target/var/log/apt/"* "$target/tmp/"*
        tar -C "$target" --numeric-owner --xattrs -cpf "$base_tar.tmp" \
            --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' --exclude='./run/*' .
        mv "$base_tar.tmp" "$base_tar"
        # A base of an older recipe or other sources is not used again.
        find "$cache/base" -maxdepth 1 -name "$codename-minbase-*.tar" ! -path "$base_tar" -delete
        cleanup
        scratch=()
    fi
    echo "image-build: importing $base_tar as $base_image"
    ctr=$("${bah[@]}" from scratch)
    containers+=("$ctr")
    "${bah[@]}" add "$ctr" "$base_tar" / >/dev/null
    "${bah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd bash "$ctr"
    "${bah[@]}" commit -q --rm "$ctr" "$base_image" >/dev/null
    containers=()
fi
base_done=$(date +%s)

# --- 2. the image -----------------------------------------------------------------------------
pip_args=()
if "$py" -m pip --version >/dev/null 2>&1; then
    mapfile -t pip_args < <("$py" -m pip config list 2>/dev/null | "${helper[@]}" pip-args)
fi
echo "image-build: building $ref (version $version) on $base_image"
log="$cache/images/archives/mesh-$tag.build.log"
"${bah[@]}" bud --isolation chroot --layers --force-rm --pull=never \
    -f "$containerfile" --build-arg "BASE=$base_image" --build-arg "VERSION=$version" \
    "${pip_args[@]}" -t "localhost/$ref" . >"$log" 2>&1 || {
    tail -30 "$log" >&2
    echo "image-build: the build failed; the whole log is $log" >&2
    exit 1
}
built=$(date +%s)

# vfs keeps every layer as a full copy: an image no tag names any more goes, unless this
# build used it (a build stage's last layer has no tag and no child, and is the cache of the
# next build), and so do its untagged ancestors, pass by pass; bases of other keys go too.
mapfile -t used < <(grep -oE -- '--> (Using cache )?[0-9a-f]{11,64}' "$log" | grep -oE '[0-9a-f]{11,64}$')
for _ in $(seq 1 60); do
    removed=0
    while read -r id; do
        [ -n "$id" ] || continue
        keep=0
        for u in "${used[@]}"; do
            case "$id" in "$u"*) keep=1 ;; esac
        done
        [ "$keep" = 1 ] && continue
        "${bah[@]}" rmi "$id" >/dev/null 2>&1 && removed=1
    done < <("${bah[@]}" images -q --no-trunc --filter dangling=true 2>/dev/null | sed 's/^sha256://')
    [ "$removed" = 1 ] || break
done
while read -r old; do
    case "$old" in
    "$base_image") ;;
    localhost/ambient-mesh/base:*) "${bah[@]}" rmi "$old" >/dev/null 2>&1 || true ;;
    esac
done < <("${bah[@]}" images --format '{{.Name}}:{{.Tag}}' 2>/dev/null)

# --- 3. the archive and the store -------------------------------------------------------------
rm -f "$archive.tmp" "$archive.digest"
"${bah[@]}" push -q --digestfile "$archive.digest" "localhost/$ref" "oci-archive:$archive.tmp:$ref"
digest=$(cat "$archive.digest")
rm -f "$archive.digest"
mv "$archive.tmp" "$archive"

mkdir -p "$dest"
new="$dest/rootfs.new"
rm -rf --one-file-system "$new"
scratch+=("$new")
ctr=$("${bah[@]}" from --pull=never "localhost/$ref")
containers+=("$ctr")
mnt=$("${bah[@]}" mount "$ctr")
cp -a "$mnt" "$new"
"${bah[@]}" umount "$ctr" >/dev/null
"${bah[@]}" rm "$ctr" >/dev/null
containers=()
# Not ready while the rootfs changes: image.json goes first and comes back last.
rm -f "$dest/image.json" "$dest/build-key"
if [ -d "$dest/rootfs" ]; then
    mv "$dest/rootfs" "$dest/rootfs.old"
    scratch+=("$dest/rootfs.old")
fi
mv "$new" "$dest/rootfs"
"${bah[@]}" inspect --type image "localhost/$ref" |
    "${helper[@]}" image-json "$ref" "$digest" >"$dest/image.json.tmp"
printf '%s\n' "$key" >"$dest/build-key"
mv "$dest/image.json.tmp" "$dest/image.json"
done_at=$(date +%s)

echo "image-build: $ref ready in $dest ($digest)"
echo "image-build: base $((base_done - start))s, build $((built - base_done))s," \
    "archive and store $((done_at - built))s; archive $(du -sh "$archive" | cut -f1)," \
    "rootfs $(du -sh "$dest/rootfs" | cut -f1)"
