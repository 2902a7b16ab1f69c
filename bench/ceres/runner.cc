// Ceres reference runner for `python -m bench`: solves pose graphs (g2o) or bundle adjustment
// problems (BAL) with exactly Ariadne's residuals, weights and initial values, and prints one JSON
// object on stdout:
//   {"time_s", "iterations", "initial_cost", "final_cost", "problems": [{...}, ...]}
// with time_s / costs summed over the files (solved one after another), iterations the maximum.
//
//   runner pose_graph [--max-iters N] [--threads T] [--prior-sqrt-info S] [--report] FILE.g2o...
//   runner bal        [--max-iters N] [--threads T] [--report] FILE.bal...
// (--report: Ceres's FullReport on stderr.)
//
// Conventions (../shared/data/README.md):
// * SE3 pose (tx, ty, tz, qx, qy, qz, qw) maps body to world. Edge (i, j, Z):
//   r = U Log(Z^-1 Ti^-1 Tj), tangent (translation rho, rotation phi), Log = (Jl(phi)^-1 t, phi),
//   U the upper Cholesky factor of S Omega S, S = diag(1, 1, 1, 1/2, 1/2, 1/2), Omega the g2o
//   information. A prior r = s Log(T0_init^-1 T0) on the first (lowest id) vertex, s = 1e3.
//   Linear solver: SPARSE_NORMAL_CHOLESKY (SuiteSparse). Each pose is one 7-vector block on
//   ProductManifold(EuclideanManifold<3>, EigenQuaternionManifold).
// * BAL camera (angle-axis R, t, f, k1, k2): P = R X + t, p = -P[:2] / P[2],
//   pred = f (1 + k1 |p|^2 + k2 |p|^4) p, r = pred - observed. Linear solver: SPARSE_SCHUR with
//   the points eliminated first.
// Cost = 0.5 sum ||r||^2 (Ceres's convention too). Time is Solve() only (no parsing).
//
// Build: g++ -O2 -std=c++17 -I/usr/include/eigen3 runner.cc -o runner -lceres -lglog
// (see CMakeLists.txt; bench/ceres/__init__.py builds it on demand into a cache folder).

#include <ceres/ceres.h>
#include <ceres/product_manifold.h>
#include <ceres/rotation.h>

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Geometry>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using Mat6 = Eigen::Matrix<double, 6, 6, Eigen::RowMajor>;

// Log(A) of an SE3 element given as translation t and unit quaternion q (x, y, z, w):
// phi = rotation vector of q (angle in [0, pi]), rho = Jl(phi)^-1 t with
// Jl^-1 = I - 1/2 [phi]x + c [phi]x^2, c = (1 - (theta / 2) cot(theta / 2)) / theta^2.
template <typename T>
void Se3Log(const Eigen::Matrix<T, 3, 1>& t, const Eigen::Quaternion<T>& q, T* out) {
  const T q_wxyz[4] = {q.w(), q.x(), q.y(), q.z()};
  T phi_arr[3];
  ceres::QuaternionToAngleAxis(q_wxyz, phi_arr);
  const Eigen::Matrix<T, 3, 1> phi(phi_arr[0], phi_arr[1], phi_arr[2]);
  const T theta2 = phi.squaredNorm();
  T c;
  if (theta2 < T(1e-2)) {  // series: 1/12 + theta^2/720 + theta^4/30240 + theta^6/1209600
    c = T(1.0 / 12.0) +
        theta2 * (T(1.0 / 720.0) + theta2 * (T(1.0 / 30240.0) + theta2 * T(1.0 / 1209600.0)));
  } else {
    const T theta = sqrt(theta2);
    c = (T(1.0) - theta * sin(theta) / (T(2.0) * (T(1.0) - cos(theta)))) / theta2;
  }
  const Eigen::Matrix<T, 3, 1> pt = phi.cross(t);
  const Eigen::Matrix<T, 3, 1> rho = t - T(0.5) * pt + c * phi.cross(pt);
  for (int k = 0; k < 3; ++k) {
    out[k] = rho[k];
    out[3 + k] = phi[k];
  }
}

// r = U Log(Z^-1 Ti^-1 Tj) over two pose blocks (7 doubles each).
struct BetweenResidual {
  BetweenResidual(const double* z, const Mat6& U) : U_(U) {
    tz_ = Eigen::Vector3d(z[0], z[1], z[2]);
    qz_ = Eigen::Quaterniond(z[6], z[3], z[4], z[5]).normalized();
  }

  template <typename T>
  bool operator()(const T* xi, const T* xj, T* residual) const {
    const Eigen::Map<const Eigen::Matrix<T, 3, 1>> ti(xi), tj(xj);
    const Eigen::Map<const Eigen::Quaternion<T>> qi(xi + 3), qj(xj + 3);
    const Eigen::Quaternion<T> qi_inv = qi.conjugate();
    const Eigen::Quaternion<T> q_ij = qi_inv * qj;
    const Eigen::Matrix<T, 3, 1> t_ij = qi_inv * (tj - ti);
    const Eigen::Quaternion<T> qz_inv = qz_.conjugate().template cast<T>();
    const Eigen::Quaternion<T> q_e = qz_inv * q_ij;
    const Eigen::Matrix<T, 3, 1> t_e = qz_inv * (t_ij - tz_.template cast<T>());
    T log[6];
    Se3Log(t_e, q_e, log);
    for (int r = 0; r < 6; ++r) {
      residual[r] = T(0.0);
      for (int c = r; c < 6; ++c) residual[r] += T(U_(r, c)) * log[c];
    }
    return true;
  }

  Eigen::Vector3d tz_;
  Eigen::Quaterniond qz_;
  Mat6 U_;
};

// r = s Log(Z^-1 T) over one pose block.
struct PriorResidual {
  PriorResidual(const double* z, double s) : s_(s) {
    tz_ = Eigen::Vector3d(z[0], z[1], z[2]);
    qz_ = Eigen::Quaterniond(z[6], z[3], z[4], z[5]).normalized();
  }

  template <typename T>
  bool operator()(const T* x, T* residual) const {
    const Eigen::Map<const Eigen::Matrix<T, 3, 1>> t(x);
    const Eigen::Map<const Eigen::Quaternion<T>> q(x + 3);
    const Eigen::Quaternion<T> qz_inv = qz_.conjugate().template cast<T>();
    const Eigen::Quaternion<T> q_e = qz_inv * q;
    const Eigen::Matrix<T, 3, 1> t_e = qz_inv * (t - tz_.template cast<T>());
    Se3Log(t_e, q_e, residual);
    for (int r = 0; r < 6; ++r) residual[r] *= T(s_);
    return true;
  }

  Eigen::Vector3d tz_;
  Eigen::Quaterniond qz_;
  double s_;
};

// BAL: P = R X + t, p = -P[:2] / P[2], pred = f (1 + k1 |p|^2 + k2 |p|^4) p, r = pred - obs.
struct ReprojectionResidual {
  ReprojectionResidual(double u, double v) : u_(u), v_(v) {}

  template <typename T>
  bool operator()(const T* camera, const T* point, T* residual) const {
    T P[3];
    ceres::AngleAxisRotatePoint(camera, point, P);
    for (int k = 0; k < 3; ++k) P[k] += camera[3 + k];
    const T px = -P[0] / P[2], py = -P[1] / P[2];
    const T r2 = px * px + py * py;
    const T scale = camera[6] * (T(1.0) + camera[7] * r2 + camera[8] * r2 * r2);
    residual[0] = scale * px - T(u_);
    residual[1] = scale * py - T(v_);
    return true;
  }

  double u_, v_;
};

struct Options {
  std::string mode;
  int max_iters = 100;
  int threads = 0;
  double prior_sqrt_info = 1e3;
  bool report = false;  // Ceres's FullReport on stderr
  std::vector<std::string> files;
};

struct Result {
  double time_s = 0.0;
  int iterations = 0;
  double initial_cost = 0.0;
  double final_cost = 0.0;
  std::string termination;
};

[[noreturn]] void Fail(const std::string& message) {
  throw std::runtime_error(message);
}

ceres::Solver::Options SolverOptions(const Options& opts) {
  ceres::Solver::Options o;
  o.max_num_iterations = opts.max_iters;
  o.num_threads = opts.threads > 0 ? opts.threads
                                   : std::max(1u, std::thread::hardware_concurrency());
  o.sparse_linear_algebra_library_type = ceres::SUITE_SPARSE;
  o.minimizer_progress_to_stdout = false;
  o.logging_type = ceres::SILENT;
  return o;
}

Result Solve(const ceres::Solver::Options& options, ceres::Problem* problem, bool report) {
  ceres::Solver::Summary summary;
  const auto start = std::chrono::steady_clock::now();
  ceres::Solve(options, problem, &summary);
  const auto stop = std::chrono::steady_clock::now();
  if (report) std::cerr << summary.FullReport() << "\n";
  if (summary.termination_type == ceres::FAILURE) Fail("Ceres failed: " + summary.message);
  Result r;
  r.time_s = std::chrono::duration<double>(stop - start).count();
  // summary.iterations holds iteration 0 (the initial point) too: count the steps tried.
  r.iterations = std::max(0, static_cast<int>(summary.iterations.size()) - 1);
  r.initial_cost = summary.initial_cost;
  r.final_cost = summary.final_cost;
  r.termination = ceres::TerminationTypeToString(summary.termination_type);
  return r;
}

Result SolvePoseGraph(const std::string& path, const Options& opts) {
  std::ifstream in(path);
  if (!in) Fail("cannot open " + path);
  std::map<long, std::vector<double>> poses;  // id -> 7 values; ordered by id
  struct Edge {
    long i, j;
    double z[7];
    Mat6 U;
  };
  std::vector<Edge> edges;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    std::istringstream s(line);
    std::string tag;
    if (!(s >> tag)) continue;
    if (tag == "VERTEX_SE3:QUAT") {
      long id;
      std::vector<double> x(7);
      s >> id;
      for (double& v : x) s >> v;
      if (!s) Fail(path + ":" + std::to_string(lineno) + ": bad vertex");
      poses[id] = x;
    } else if (tag == "EDGE_SE3:QUAT") {
      Edge e;
      s >> e.i >> e.j;
      for (double& v : e.z) s >> v;
      Mat6 omega;
      for (int r = 0; r < 6; ++r)
        for (int c = r; c < 6; ++c) {
          s >> omega(r, c);
          omega(c, r) = omega(r, c);
        }
      if (!s) Fail(path + ":" + std::to_string(lineno) + ": bad edge");
      const Eigen::Matrix<double, 6, 1> scale =
          (Eigen::Matrix<double, 6, 1>() << 1, 1, 1, 0.5, 0.5, 0.5).finished();
      const Mat6 tangent = scale.asDiagonal() * omega * scale.asDiagonal();
      Eigen::LLT<Eigen::Matrix<double, 6, 6>> llt(tangent);
      if (llt.info() != Eigen::Success) Fail(path + ":" + std::to_string(lineno) + ": not PD");
      e.U = llt.matrixU();
      edges.push_back(e);
    } else if (tag != "FIX") {
      Fail(path + ":" + std::to_string(lineno) + ": unsupported record " + tag);
    }
  }
  if (poses.empty()) Fail(path + ": no VERTEX_SE3:QUAT records");
  for (auto& [id, x] : poses) {  // unit quaternions, as Ariadne's reader stores them
    Eigen::Map<Eigen::Quaterniond> q(x.data() + 3);
    q.normalize();
  }
  ceres::Problem::Options problem_options;
  problem_options.manifold_ownership = ceres::DO_NOT_TAKE_OWNERSHIP;
  ceres::Problem problem(problem_options);
  ceres::ProductManifold<ceres::EuclideanManifold<3>, ceres::EigenQuaternionManifold> manifold;
  for (auto& [id, x] : poses) problem.AddParameterBlock(x.data(), 7, &manifold);
  for (const Edge& e : edges) {
    auto pi = poses.find(e.i), pj = poses.find(e.j);
    if (pi == poses.end() || pj == poses.end()) Fail(path + ": edge to an unknown vertex");
    problem.AddResidualBlock(
        new ceres::AutoDiffCostFunction<BetweenResidual, 6, 7, 7>(new BetweenResidual(e.z, e.U)),
        nullptr, pi->second.data(), pj->second.data());
  }
  std::vector<double>& first = poses.begin()->second;
  problem.AddResidualBlock(new ceres::AutoDiffCostFunction<PriorResidual, 6, 7>(
                               new PriorResidual(first.data(), opts.prior_sqrt_info)),
                           nullptr, first.data());
  ceres::Solver::Options options = SolverOptions(opts);
  options.linear_solver_type = ceres::SPARSE_NORMAL_CHOLESKY;
  return Solve(options, &problem, opts.report);
}

Result SolveBal(const std::string& path, const Options& opts) {
  std::ifstream in(path);
  if (!in) Fail("cannot open " + path);
  long nc, np, no;
  if (!(in >> nc >> np >> no)) Fail(path + ": bad BAL header");
  std::vector<long> cam(no), pt(no);
  std::vector<double> obs(2 * no), cameras(9 * nc), points(3 * np);
  for (long k = 0; k < no; ++k) in >> cam[k] >> pt[k] >> obs[2 * k] >> obs[2 * k + 1];
  for (double& v : cameras) in >> v;
  for (double& v : points) in >> v;
  if (!in) Fail(path + ": truncated BAL file");
  ceres::Problem problem;
  for (long k = 0; k < no; ++k) {
    if (cam[k] < 0 || cam[k] >= nc || pt[k] < 0 || pt[k] >= np) Fail(path + ": bad index");
    problem.AddResidualBlock(
        new ceres::AutoDiffCostFunction<ReprojectionResidual, 2, 9, 3>(
            new ReprojectionResidual(obs[2 * k], obs[2 * k + 1])),
        nullptr, &cameras[9 * cam[k]], &points[3 * pt[k]]);
  }
  ceres::Solver::Options options = SolverOptions(opts);
  options.linear_solver_type = ceres::SPARSE_SCHUR;
  auto ordering = std::make_shared<ceres::ParameterBlockOrdering>();
  for (long p = 0; p < np; ++p) ordering->AddElementToGroup(&points[3 * p], 0);
  for (long c = 0; c < nc; ++c) ordering->AddElementToGroup(&cameras[9 * c], 1);
  options.linear_solver_ordering = ordering;
  return Solve(options, &problem, opts.report);
}

Options ParseArgs(int argc, char** argv) {
  if (argc < 2) Fail("usage: runner pose_graph|bal [--max-iters N] [--threads T] "
                     "[--prior-sqrt-info S] [--report] FILE...");
  Options o;
  o.mode = argv[1];
  if (o.mode != "pose_graph" && o.mode != "bal") Fail("unknown mode " + o.mode);
  for (int k = 2; k < argc; ++k) {
    const std::string a = argv[k];
    auto value = [&]() -> std::string {
      if (k + 1 >= argc) Fail("missing value after " + a);
      return argv[++k];
    };
    if (a == "--max-iters") {
      o.max_iters = std::stoi(value());
    } else if (a == "--threads") {
      o.threads = std::stoi(value());
    } else if (a == "--report") {
      o.report = true;
    } else if (a == "--prior-sqrt-info") {
      o.prior_sqrt_info = std::stod(value());
    } else {
      o.files.push_back(a);
    }
  }
  if (o.files.empty()) Fail("no input files");
  return o;
}

void PrintJson(const std::vector<Result>& results) {
  Result total;
  for (const Result& r : results) {
    total.time_s += r.time_s;
    total.iterations = std::max(total.iterations, r.iterations);
    total.initial_cost += r.initial_cost;
    total.final_cost += r.final_cost;
  }
  std::printf("{\"time_s\": %.9g, \"iterations\": %d, \"initial_cost\": %.17g, "
              "\"final_cost\": %.17g, \"ceres_version\": \"%s\", \"problems\": [",
              total.time_s, total.iterations, total.initial_cost, total.final_cost,
              CERES_VERSION_STRING);
  for (size_t k = 0; k < results.size(); ++k) {
    const Result& r = results[k];
    std::printf("%s{\"time_s\": %.9g, \"iterations\": %d, \"initial_cost\": %.17g, "
                "\"final_cost\": %.17g, \"termination\": \"%s\"}",
                k ? ", " : "", r.time_s, r.iterations, r.initial_cost, r.final_cost,
                r.termination.c_str());
  }
  std::printf("]}\n");
}

}  // namespace

int main(int argc, char** argv) {
  google::InitGoogleLogging(argv[0]);
  try {
    const Options opts = ParseArgs(argc, argv);
    std::vector<Result> results;
    for (const std::string& file : opts.files)
      results.push_back(opts.mode == "bal" ? SolveBal(file, opts) : SolvePoseGraph(file, opts));
    PrintJson(results);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ceres runner: %s\n", e.what());
    return 1;
  }
  return 0;
}
